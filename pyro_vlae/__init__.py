"""pyro_vlae: Variational Ladder Autoencoders and stacked hierarchical VAEs in Pyro.

Zhao, Song & Ermon (2017), *Learning Hierarchical Features from Generative Models*.
"""

__version__ = "0.1.0"
