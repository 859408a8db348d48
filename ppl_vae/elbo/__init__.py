"""The ELBO layer: a model/guide pair -> numbers (the bound per site, log p(x), the exact
posterior, check_pair, beta scaling, ELBO classes). Knows nothing of VAEs, training or run folders.
"""
