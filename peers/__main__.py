from peers.cli import main

raise SystemExit(main())
