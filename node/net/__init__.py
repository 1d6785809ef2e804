"""The network side of a node: the peer node (adverts, gossip), transports,
the HTTP edge, rate limits, metrics, and the virtual-time loop of the simulation.
"""
