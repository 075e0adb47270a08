# The providers this module uses. The caller passes one configuration of each (the region's aliased `aws`
# provider and the `kubernetes` / `kustomization` providers pointed at this region's EKS cluster); the module
# declares no provider blocks itself, so it can be instantiated once per region.
terraform {
  required_version = ">= 1.6.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.80"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.35"
    }
    kustomization = {
      source  = "kbst/kustomization"
      version = "~> 0.9.6"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
}
