"""kms: a local key management service speaking Huawei KMS v1.0."""
