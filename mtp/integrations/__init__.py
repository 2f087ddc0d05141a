"""Adapters that make other libraries' DeepSeek-V4 models targets of :mod:`mtp.speculative`.

Each adapter lives in its own module and imports its library only when used:
``mtp.integrations.transformers`` (``pip install 'mtp[transformers]'``).
"""
