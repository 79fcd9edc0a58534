"""Text in and out of a GLM: the tokenizer (tokenizer.json, incremental detokenizing), the chat template
(rendered as transformers renders it, GLM-4.5 and GLM-4.7/5 layouts built in), the streaming parser
that splits output into thinking, content and tool calls, and the small tokenizer make-tiny trains."""
