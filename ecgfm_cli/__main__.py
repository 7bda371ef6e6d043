from ecgfm_cli.cli import main

main()
