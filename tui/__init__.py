"""tui: `localglm chat`, the terminal chat app (Textual): app.py (screens, workers, keys), widgets.py
(messages, stats and keys panels), store.py (saved conversations), metrics.py (what the panels show)."""
