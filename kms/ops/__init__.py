"""The KMS handlers, one module per concern; kms.api imports them all."""
