"""Device-side helpers that run on the host: embedded broker, demo, (later) profiles and simulator.

May start brokers and agents; uses edge_slm and converters.
"""
