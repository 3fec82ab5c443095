"""The command-line tools: one module per tool, each with ``get_args_parser()`` and
``main(argv) -> exit status``; ``tools/<tool>.py`` and ``python -m ssd_da.cli.<tool>`` run them."""
