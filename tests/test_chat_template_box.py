"""A chat template is code from the checkpoint: rendering one is time-boxed and memory-boxed (issue 17).
Each hostile template below ends in one TokenizerError naming the template (a `localglm: error:` line in
the CLI) instead of a traceback, an hour-long loop or gigabytes of RAM; the real GLM templates render as
before (test_chat_template.py compares them with transformers byte for byte)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from localglm.chat.template import ChatTemplate
from localglm.chat.template_box import RenderLimits
from localglm.errors import TokenizerError
from tests.probes import run_cli

FAST = RenderLimits(seconds=0.5)
SMALL = RenderLimits(seconds=120, max_chars=1 << 22)  # the size limit, not the clock, must stop these, even on a loaded machine
USER = [{"role": "user", "content": "a\n" * 20_000}]

TOO_BIG = {  # each would allocate a GB or more (or a 100M-bit integer) without the box
    "range": "{% for i in range(10**9) %}x{% endfor %}",
    "str_times_int": "{{ 'x' * 10**9 }}",
    "int_times_str": "{{ 10**9 * 'x' }}",
    "list_times_int": "{{ ([1] * 10**9)|length }}",
    "center_filter": "{{ 'x'|center(10**9) }}",
    "center_method": "{{ 'x'.center(10**9) }}",
    "tojson_indent": "{{ messages|tojson(indent=10**9) }}",
    "power": "{{ 2 ** 100000000 }}",
    "percent_width": "{{ '%999999999d' % 1 }}",
    "format_width": "{{ '{:>999999999}'.format(1) }}",
    "format_filter_width": "{{ '%999999999d'|format(1) }}",
    "replace_empty": "{{ messages[0].content.replace('', messages[0].content) }}",
    "join": "{% set s = 'x' * 60000000 %}{{ [s, s, s, s]|join }}",
    "namespace_doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "namespace_plus": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "macro_doubling": "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ f('x', 60) }}",
    "output": "{% set s = 'x' * 60000 %}{% for i in range(100000) %}{% for j in range(100) %}{{ s }}{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}
TOO_SLOW = {  # hours without the time box
    "nested_ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_over_content": "{% for c in messages[0].content %}{% for d in messages[0].content %}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(TOO_BIG))
def test_templates_that_build_too_much_are_one_error(name: str) -> None:
    with pytest.raises(TokenizerError, match=r"^evil: rendering failed: .*(limit|MAX_RANGE|recurses)") as exc:
        ChatTemplate(TOO_BIG[name], name="evil", limits=SMALL).render(USER)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", sorted(TOO_SLOW))
def test_templates_that_loop_too_long_are_stopped(name: str) -> None:
    with pytest.raises(TokenizerError, match=r"^evil: rendering took longer than 0.5 s"):
        ChatTemplate(TOO_SLOW[name], name="evil", limits=FAST).render(USER)
    ChatTemplate("{{ messages[0].role }}", limits=FAST).render(USER)  # the thread renders normally afterwards


def test_a_render_that_ends_in_time_leaves_no_pending_timeout() -> None:
    """The watchdog's exception is withdrawn when a render ends first: none surfaces later in the caller."""
    template = ChatTemplate("{% for i in range(20000) %}{{ i }}{% endfor %}", limits=RenderLimits(seconds=0.002))
    for _ in range(200):  # some of these finish right at the deadline
        try:
            template.render(USER)
        except TokenizerError:
            pass
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:  # a stray RenderTimeout would be raised in this loop
        sum(range(1000))


def test_ordinary_template_features_still_work() -> None:
    src = "{% for m in messages %}<|{{ m.role }}|>{{ m.content[:2] }}{% endfor %}{{ '%05d' % 7 }}{{ 'ab'.center(6) }}|{{ [1, 2]|join(',') }}|{{ 'x' * 3 }}|{{ '{:>4}'.format(5) }}|{{ 12345678901 }}|{{ 'a' ~ 'b' }}"
    assert ChatTemplate(src, limits=FAST).render(USER) == "<|user|>a\n00007  ab  |1,2|xxx|   5|12345678901|ab"


def test_cli_names_the_template(tiny_dir: Path, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_dir, tmp_path / "m")
    (model / "chat_template.jinja").write_text("{% for i in range(10**9) %}x{% endfor %}")
    o = run_cli("generate", model, "--chat", "-p", "hi", "-n", "1", "-q")
    assert o.kind == "clean" and "chat_template" in o.err and "MAX_RANGE" in o.err, o.why()
