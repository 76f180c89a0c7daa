"""Model side of tome-serve: Token Merging (``models.tome``) and its benchmark (``models.bench``)."""
