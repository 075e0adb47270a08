# ferry on AWS in several regions behind one latency-routed DNS name.
#
# Terraform cannot create providers with for_each, so every supported region has its own aliased `aws`,
# `kubernetes` and `kustomization` provider and its own module block below; var.regions says which of them
# exist and with which settings (a supported region left out of the map gets count = 0). Adding a region is
# a copy of one region's block (see README).

locals {
  default_tags = merge(var.tags, {
    "app.kubernetes.io/part-of" = "ferry"
    "managed-by"                = "terraform"
  })
}

# The default provider: global resources (Route 53 zone, records and health checks are global; their API
# lives in us-east-1).
provider "aws" {
  region = "us-east-1"

  default_tags {
    tags = local.default_tags
  }
}

provider "aws" {
  alias  = "eu_west_1"
  region = "eu-west-1"

  default_tags {
    tags = local.default_tags
  }
}

provider "aws" {
  alias  = "us_east_1"
  region = "us-east-1"

  default_tags {
    tags = local.default_tags
  }
}

# The JWT key is global: latency routing may send a client to any region, and every region's gateways must
# accept the client's token. It goes to each region's Secrets Manager and ferry-secrets, never to an output.
resource "random_password" "jwt" {
  length  = 64
  special = false
}

# ---------------------------------------------------------------------------------------------------------------
# eu-west-1

module "eu_west_1" {
  source = "./modules/region"
  count  = contains(keys(var.regions), "eu-west-1") ? 1 : 0

  providers = {
    aws           = aws.eu_west_1
    kubernetes    = kubernetes.eu_west_1
    kustomization = kustomization.eu_west_1
    random        = random
  }

  name                              = var.project_name
  region                            = "eu-west-1"
  kustomize_overlay                 = var.regions["eu-west-1"].kustomize_overlay
  vpc_cidr                          = var.regions["eu-west-1"].vpc_cidr
  availability_zones                = var.regions["eu-west-1"].availability_zones
  gateway_tls_certificate_arn       = var.regions["eu-west-1"].gateway_tls_certificate_arn
  kubernetes_version                = var.regions["eu-west-1"].kubernetes_version
  cluster_public_access_cidrs       = var.cluster_public_access_cidrs
  cluster_admin_role_arns           = var.cluster_admin_role_arns
  node_instance_types               = var.regions["eu-west-1"].node_instance_types
  node_min_size                     = var.regions["eu-west-1"].node_min_size
  node_desired_size                 = var.regions["eu-west-1"].node_desired_size
  node_max_size                     = var.regions["eu-west-1"].node_max_size
  redis_node_type                   = var.regions["eu-west-1"].redis_node_type
  redis_num_cache_clusters          = var.regions["eu-west-1"].redis_num_cache_clusters
  redis_cluster_mode                = var.regions["eu-west-1"].redis_cluster_mode
  redis_num_node_groups             = var.regions["eu-west-1"].redis_num_node_groups
  redis_replicas_per_node_group     = var.regions["eu-west-1"].redis_replicas_per_node_group
  postgres_instance_class           = var.regions["eu-west-1"].postgres_instance_class
  postgres_allocated_storage_gb     = var.regions["eu-west-1"].postgres_allocated_storage_gb
  postgres_max_allocated_storage_gb = var.regions["eu-west-1"].postgres_max_allocated_storage_gb
  postgres_backup_retention_days    = var.regions["eu-west-1"].postgres_backup_retention_days
  jwt_secret                        = random_password.jwt.result
  tags                              = var.tags
}

provider "kubernetes" {
  alias                  = "eu_west_1"
  host                   = try(module.eu_west_1[0].cluster_endpoint, null)
  cluster_ca_certificate = try(base64decode(module.eu_west_1[0].cluster_certificate_authority_data), null)

  # Short-lived tokens from the AWS CLI, fetched when needed (a token read once at plan time can expire
  # during a long apply).
  exec {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--region", "eu-west-1", "--cluster-name", try(module.eu_west_1[0].cluster_name, "")]
  }
}

provider "kustomization" {
  alias          = "eu_west_1"
  kubeconfig_raw = local.kubeconfigs["eu-west-1"]
}

# ---------------------------------------------------------------------------------------------------------------
# us-east-1

module "us_east_1" {
  source = "./modules/region"
  count  = contains(keys(var.regions), "us-east-1") ? 1 : 0

  providers = {
    aws           = aws.us_east_1
    kubernetes    = kubernetes.us_east_1
    kustomization = kustomization.us_east_1
    random        = random
  }

  name                              = var.project_name
  region                            = "us-east-1"
  kustomize_overlay                 = var.regions["us-east-1"].kustomize_overlay
  vpc_cidr                          = var.regions["us-east-1"].vpc_cidr
  availability_zones                = var.regions["us-east-1"].availability_zones
  gateway_tls_certificate_arn       = var.regions["us-east-1"].gateway_tls_certificate_arn
  kubernetes_version                = var.regions["us-east-1"].kubernetes_version
  cluster_public_access_cidrs       = var.cluster_public_access_cidrs
  cluster_admin_role_arns           = var.cluster_admin_role_arns
  node_instance_types               = var.regions["us-east-1"].node_instance_types
  node_min_size                     = var.regions["us-east-1"].node_min_size
  node_desired_size                 = var.regions["us-east-1"].node_desired_size
  node_max_size                     = var.regions["us-east-1"].node_max_size
  redis_node_type                   = var.regions["us-east-1"].redis_node_type
  redis_num_cache_clusters          = var.regions["us-east-1"].redis_num_cache_clusters
  redis_cluster_mode                = var.regions["us-east-1"].redis_cluster_mode
  redis_num_node_groups             = var.regions["us-east-1"].redis_num_node_groups
  redis_replicas_per_node_group     = var.regions["us-east-1"].redis_replicas_per_node_group
  postgres_instance_class           = var.regions["us-east-1"].postgres_instance_class
  postgres_allocated_storage_gb     = var.regions["us-east-1"].postgres_allocated_storage_gb
  postgres_max_allocated_storage_gb = var.regions["us-east-1"].postgres_max_allocated_storage_gb
  postgres_backup_retention_days    = var.regions["us-east-1"].postgres_backup_retention_days
  jwt_secret                        = random_password.jwt.result
  tags                              = var.tags
}

provider "kubernetes" {
  alias                  = "us_east_1"
  host                   = try(module.us_east_1[0].cluster_endpoint, null)
  cluster_ca_certificate = try(base64decode(module.us_east_1[0].cluster_certificate_authority_data), null)

  exec {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--region", "us-east-1", "--cluster-name", try(module.us_east_1[0].cluster_name, "")]
  }
}

provider "kustomization" {
  alias          = "us_east_1"
  kubeconfig_raw = local.kubeconfigs["us-east-1"]
}

# ---------------------------------------------------------------------------------------------------------------
# What the regions have in common, keyed by region name.

locals {
  regional = {
    for region, instances in { "eu-west-1" = module.eu_west_1, "us-east-1" = module.us_east_1 } :
    region => instances[0] if length(instances) > 0
  }

  # Per region, exactly the cluster outputs the Kubernetes-side providers need. The providers must reference
  # these single outputs, never a whole module object: that would make them depend on every output, including
  # gateway_hostname, which is read through those very providers (a cycle).
  clusters = {
    "eu-west-1" = {
      enabled  = contains(keys(var.regions), "eu-west-1")
      name     = try(module.eu_west_1[0].cluster_name, "")
      endpoint = try(module.eu_west_1[0].cluster_endpoint, "")
      ca_data  = try(module.eu_west_1[0].cluster_certificate_authority_data, "")
    }
    "us-east-1" = {
      enabled  = contains(keys(var.regions), "us-east-1")
      name     = try(module.us_east_1[0].cluster_name, "")
      endpoint = try(module.us_east_1[0].cluster_endpoint, "")
      ca_data  = try(module.us_east_1[0].cluster_certificate_authority_data, "")
    }
  }

  # A kubeconfig per region for the kustomization provider, with the same exec credential plugin as the
  # kubernetes provider. Regions that are switched off get an empty one (their provider has nothing to do).
  kubeconfigs = {
    for region, c in local.clusters : region => (
      c.enabled ? yamlencode({
        apiVersion      = "v1"
        kind            = "Config"
        current-context = region
        preferences     = {}
        clusters        = [{ name = region, cluster = { server = c.endpoint, certificate-authority-data = c.ca_data } }]
        users           = [{ name = region, user = { exec = { apiVersion = "client.authentication.k8s.io/v1beta1", command = "aws", args = ["eks", "get-token", "--region", region, "--cluster-name", c.name] } } }]
        contexts        = [{ name = region, context = { cluster = region, user = region } }]
      }) : ""
    )
  }
}
