terraform {
  # 1.6+ for the module features used here (optional() object attributes with defaults, preconditions);
  # checked with 1.11.
  required_version = ">= 1.6.0, < 2.0.0"

  # Exact versions: an upgrade is a reviewed change here (and in .terraform.lock.hcl, which `terraform init`
  # writes and which is committed once providers could be downloaded).
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "5.82.2"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "2.35.1"
    }
    kustomization = {
      source  = "kbst/kustomization"
      version = "0.9.6"
    }
    random = {
      source  = "hashicorp/random"
      version = "3.6.3"
    }
  }

  # Remote state, one per environment. The state holds the generated secrets (every value Terraform sets is in
  # it), so the bucket must be encrypted, versioned and readable only by the deployers. Credentials come from
  # the environment (AWS_PROFILE, an assumed role in CI), never from this file. Uncomment and fill in, then
  # `terraform init -migrate-state`:
  #
  # backend "s3" {
  #   bucket         = "example-ferry-terraform-state"
  #   key            = "ferry/production/terraform.tfstate"
  #   region         = "eu-west-1"
  #   encrypt        = true
  #   kms_key_id     = "alias/example-terraform-state"
  #   dynamodb_table = "example-terraform-locks"
  # }
}
