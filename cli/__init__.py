"""The `ckl` command line: the hub (cli/main.py) and one module per command. It imports every other
package; nothing imports it."""
