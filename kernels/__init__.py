"""mtp_kernels: optional accelerated kernels for mtp (installed from the repo's ``kernels/``).

Each kernel sits beside the pure-PyTorch reference it replaces (``mtp.ops`` / ``mtp.model``) and
is selected explicitly; nothing here is imported by ``mtp`` on the CPU path.
"""
