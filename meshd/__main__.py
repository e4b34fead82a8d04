from meshd.ops.cli import main

main()
