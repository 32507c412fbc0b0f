"""The trust framework directory's API (Raidiam Connect): the client the lifecycle operations use to have a
CSR made into a certificate, download it, list and revoke certificates, over mTLS with the transport key."""
