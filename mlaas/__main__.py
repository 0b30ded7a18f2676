from mlaas.cli import main

main()
