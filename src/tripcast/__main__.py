from tripcast.cli import main

main()
