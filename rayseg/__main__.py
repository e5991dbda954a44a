from rayseg.cli import main

raise SystemExit(main())
