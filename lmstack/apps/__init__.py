"""Applications built only from lmstack's public pieces (customer support first)."""
