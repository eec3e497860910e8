"""Local stand-ins for the clouds: moto's AWS server with IAM on, and a GCP REST fake."""
