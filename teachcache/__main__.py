from teachcache.cli import main

main()
