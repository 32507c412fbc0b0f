"""Everything that touches PKCS#11. Nothing here knows about Open Finance."""
