"""tpp-agent: a TPP's HSM-backed keys for UAE Open Finance, served to local services."""

__version__ = "0.1.0"
