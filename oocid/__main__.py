from oocid.cli import main

main()
