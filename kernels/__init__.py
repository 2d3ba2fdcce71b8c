"""dupmae.kernels"""
