"""A model bank (LFI) for the demo and the tests: not part of the product.

It plays an Al Tareq bank's discovery and registration endpoints over mutual TLS,
with its own test CA that also stands in for the trust framework's directory.
"""

from modelbank.ca import CsrError, TestCA
from modelbank.server import FAILURE_MODES, Behaviour, ModelBank, ServerCert

__all__ = ["FAILURE_MODES", "Behaviour", "CsrError", "ModelBank", "ServerCert", "TestCA"]
