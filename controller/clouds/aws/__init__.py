"""Amazon Web Services: access-key files, their validation, the EC2 aggregator provider."""
