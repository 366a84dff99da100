from aiqueue.cli.app import main

main()
