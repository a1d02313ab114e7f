from mar3d.cli import main

raise SystemExit(main())
