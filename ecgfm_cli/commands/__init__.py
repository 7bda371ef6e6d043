"""One module per subcommand: option declarations only; the work lives in the core modules.

Heavy imports (torch, sklearn, matplotlib, pyarrow) happen inside the command functions so that
``ecgfm --help`` and the data commands start fast.
"""
