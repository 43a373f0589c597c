from jsnap.cli import main

raise SystemExit(main())
