# `python -m mar3d`: the library's commands only (data, train, evaluate, generate, promote,
# cluster, config). The installed `mar3d` command adds `pipeline` and `ray` (pipelines/cli.py);
# `python -m pipelines` is that full command.
from mar3d.cli import main

raise SystemExit(main())
