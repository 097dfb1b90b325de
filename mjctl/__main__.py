from mjctl.cli import main

main()
