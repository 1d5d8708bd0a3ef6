from flux_mcp.cli import main

raise SystemExit(main())
