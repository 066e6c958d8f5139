"""Code that both tests/ and benchmarks/ use: the min-dalle port (an independent PyTorch reference of
DalleBart and the VQGAN decoder), tiny random model folders, the live-app subprocess and the
load-test client. Imports go one way: tests/ and benchmarks/ import support/, support/ imports
neither of them (only model/), and model/ imports none of the three.
"""
