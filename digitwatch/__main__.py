from digitwatch.cli import main

main()
