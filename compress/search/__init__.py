"""Compress to a budget: the recipe's ``target:``/``search:`` blocks, the candidate space and the
frontier. ``compress search`` (compress/commands/search.py) drives them."""
