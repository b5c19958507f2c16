"""`python -m minivllm ...`: see minivllm/cli.py."""

from minivllm.cli import main

raise SystemExit(main())
