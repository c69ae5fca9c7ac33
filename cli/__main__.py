from pgsink.cli.main import main

main()
