variable "name" {
  description = "Name prefix of every resource of this region (e.g. `ferry`); the region name is appended where AWS names must be unique per account."
  type        = string
  default     = "ferry"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2-21 characters of lower-case letters, digits and '-', starting with a letter."
  }
}

variable "region" {
  description = "AWS region this module instance builds in (must match the region of the `aws` provider passed in), e.g. `eu-west-1`."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as eu-west-1 or us-east-1."
  }
}

variable "kustomize_overlay" {
  description = "Name of the kustomize overlay under k8s/overlays/ applied to this region's cluster, e.g. `eu-west`."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]*$", var.kustomize_overlay))
    error_message = "kustomize_overlay must be a directory name of lower-case letters, digits and '-'."
  }
}

variable "k8s_root" {
  description = "Path of the repository's k8s/ directory (the kustomize base and overlays), relative to where Terraform runs or absolute; null means the k8s/ directory of this repository, found relative to the module."
  type        = string
  default     = null
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the region's VPC, a /16 to /20; it is split into one public and one private subnet per availability zone. Give every region a distinct range so the VPCs can be peered later."
  type        = string

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 20
    error_message = "vpc_cidr must be a valid IPv4 CIDR with a prefix length between /16 and /20."
  }
}

variable "availability_zones" {
  description = "Availability zones (full names) the subnets, NAT gateways, node group, Redis nodes and the PostgreSQL standby are spread over; at least 3. null means the region's zones a, b and c. Pinned by name so the set never changes when AWS adds or impairs a zone."
  type        = list(string)
  default     = null

  validation {
    condition     = var.availability_zones == null || try(length(var.availability_zones) >= 3 && length(var.availability_zones) <= 6 && length(distinct(var.availability_zones)) == length(var.availability_zones), false)
    error_message = "availability_zones must list 3 to 6 distinct zones, or be null."
  }
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the EKS control plane and the managed node group, e.g. `1.31`."
  type        = string
  default     = "1.31"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version))
    error_message = "kubernetes_version must look like 1.31."
  }
}

variable "cluster_public_access_cidrs" {
  description = "CIDRs allowed to reach the EKS API server's public endpoint (where Terraform and CI run from). Never 0.0.0.0/0."
  type        = list(string)

  validation {
    condition     = length(var.cluster_public_access_cidrs) > 0 && alltrue([for c in var.cluster_public_access_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "cluster_public_access_cidrs must be a non-empty list of valid CIDRs, none of them 0.0.0.0/0."
  }
}

variable "cluster_admin_role_arns" {
  description = "IAM role ARNs given cluster-admin on the EKS cluster through access entries (the identity that runs Terraform gets it anyway as the cluster creator)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.cluster_admin_role_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$", a))])
    error_message = "cluster_admin_role_arns must be IAM role ARNs."
  }
}

variable "node_instance_types" {
  description = "EC2 instance types of the managed node group (the first one that has capacity is used)."
  type        = list(string)
  default     = ["m6i.large"]

  validation {
    condition     = length(var.node_instance_types) > 0
    error_message = "node_instance_types must name at least one instance type."
  }
}

variable "node_min_size" {
  description = "Minimum number of nodes of the managed node group."
  type        = number
  default     = 3

  validation {
    condition     = var.node_min_size >= 1
    error_message = "node_min_size must be at least 1."
  }
}

variable "node_desired_size" {
  description = "Initial number of nodes of the managed node group (later changes by the autoscaler are ignored)."
  type        = number
  default     = 3

  validation {
    condition     = var.node_desired_size >= 1
    error_message = "node_desired_size must be at least 1."
  }
}

variable "node_max_size" {
  description = "Maximum number of nodes of the managed node group."
  type        = number
  default     = 9

  validation {
    condition     = var.node_max_size >= 1 && var.node_max_size <= 100
    error_message = "node_max_size must be from 1 to 100."
  }
}

variable "node_disk_size_gb" {
  description = "Root volume size of each node in GiB."
  type        = number
  default     = 50

  validation {
    condition     = var.node_disk_size_gb >= 20 && var.node_disk_size_gb <= 1000
    error_message = "node_disk_size_gb must be from 20 to 1000."
  }
}

variable "redis_node_type" {
  description = "ElastiCache node type of the Redis replication group, e.g. `cache.r7g.large`."
  type        = string
  default     = "cache.r7g.large"

  validation {
    condition     = can(regex("^cache\\.[a-z0-9]+\\.[a-z0-9]+$", var.redis_node_type))
    error_message = "redis_node_type must be an ElastiCache node type such as cache.r7g.large."
  }
}

variable "redis_engine_version" {
  description = "Redis engine version of the ElastiCache replication group."
  type        = string
  default     = "7.1"
}

variable "redis_num_cache_clusters" {
  description = "Number of Redis nodes (one primary plus replicas) in the replication group, spread over the availability zones; at least 2 for automatic failover."
  type        = number
  default     = 3

  validation {
    condition     = var.redis_num_cache_clusters >= 2 && var.redis_num_cache_clusters <= 6
    error_message = "redis_num_cache_clusters must be from 2 to 6."
  }
}

variable "redis_cluster_mode" {
  description = "Run the region's Redis as a Redis Cluster (ElastiCache cluster mode enabled): `redis_num_node_groups` shards of one primary and `redis_replicas_per_node_group` replicas each, reached by ferry with --redis-cluster. False: one shard of `redis_num_cache_clusters` nodes, reached with --redis."
  type        = bool
  default     = false
}

variable "redis_num_node_groups" {
  description = "With `redis_cluster_mode`: the number of shards (node groups, each a primary and its replicas) the slots are spread over."
  type        = number
  default     = 3

  validation {
    condition     = var.redis_num_node_groups >= 1 && var.redis_num_node_groups <= 500
    error_message = "redis_num_node_groups must be from 1 to 500."
  }
}

variable "redis_replicas_per_node_group" {
  description = "With `redis_cluster_mode`: replicas of each shard's primary, spread over the availability zones; at least 1 for automatic failover."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_replicas_per_node_group >= 1 && var.redis_replicas_per_node_group <= 5
    error_message = "redis_replicas_per_node_group must be from 1 to 5."
  }
}

variable "redis_snapshot_retention_days" {
  description = "Days ElastiCache keeps automatic Redis snapshots."
  type        = number
  default     = 7

  validation {
    condition     = var.redis_snapshot_retention_days >= 1 && var.redis_snapshot_retention_days <= 35
    error_message = "redis_snapshot_retention_days must be from 1 to 35."
  }
}

variable "postgres_instance_class" {
  description = "RDS instance class of the PostgreSQL database, e.g. `db.r6g.large`."
  type        = string
  default     = "db.r6g.large"

  validation {
    condition     = can(regex("^db\\.[a-z0-9]+\\.[a-z0-9]+$", var.postgres_instance_class))
    error_message = "postgres_instance_class must be an RDS instance class such as db.r6g.large."
  }
}

variable "postgres_engine_version" {
  description = "PostgreSQL engine version; a 15.x version (major 15 is what ferry is tested with)."
  type        = string
  default     = "15.8"

  validation {
    condition     = can(regex("^15(\\.[0-9]+)?$", var.postgres_engine_version))
    error_message = "postgres_engine_version must be PostgreSQL 15 (15 or 15.x)."
  }
}

variable "postgres_allocated_storage_gb" {
  description = "Initial gp3 storage of the PostgreSQL instance in GiB."
  type        = number
  default     = 100

  validation {
    condition     = var.postgres_allocated_storage_gb >= 20 && var.postgres_allocated_storage_gb <= 65536
    error_message = "postgres_allocated_storage_gb must be from 20 to 65536."
  }
}

variable "postgres_max_allocated_storage_gb" {
  description = "Upper limit in GiB for RDS storage autoscaling of the PostgreSQL instance (must be at least postgres_allocated_storage_gb)."
  type        = number
  default     = 500

  validation {
    condition     = var.postgres_max_allocated_storage_gb >= 20 && var.postgres_max_allocated_storage_gb <= 65536
    error_message = "postgres_max_allocated_storage_gb must be from 20 to 65536."
  }
}

variable "postgres_backup_retention_days" {
  description = "Days RDS keeps automated PostgreSQL backups (point-in-time recovery window)."
  type        = number
  default     = 14

  validation {
    condition     = var.postgres_backup_retention_days >= 7 && var.postgres_backup_retention_days <= 35
    error_message = "postgres_backup_retention_days must be from 7 to 35."
  }
}

variable "postgres_database_name" {
  description = "Name of the database ferry uses on the PostgreSQL instance."
  type        = string
  default     = "ferry"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,62}$", var.postgres_database_name))
    error_message = "postgres_database_name must be a lower-case PostgreSQL identifier."
  }
}

variable "postgres_username" {
  description = "Master user name of the PostgreSQL instance (its password is generated and kept in Secrets Manager)."
  type        = string
  default     = "ferry"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,15}$", var.postgres_username)) && !contains(["admin", "postgres", "rdsadmin"], var.postgres_username)
    error_message = "postgres_username must be a lower-case identifier of at most 16 characters and not a reserved name."
  }
}

variable "namespace" {
  description = "Kubernetes namespace of the ferry workloads; it must be the namespace the kustomize overlay deploys into."
  type        = string
  default     = "ferry"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", var.namespace))
    error_message = "namespace must be a valid Kubernetes namespace name."
  }
}

variable "gateway_tls_certificate_arn" {
  description = "ACM certificate ARN for the gateways' public load balancer: with one it listens with TLS on 443, without (null) plain HTTP on 80."
  type        = string
  default     = null

  validation {
    condition     = var.gateway_tls_certificate_arn == null || can(regex("^arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate/.+$", var.gateway_tls_certificate_arn))
    error_message = "gateway_tls_certificate_arn must be an ACM certificate ARN, or null."
  }
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the VPC flow logs and the EKS control-plane logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a CloudWatch retention value of at least one year (365, 400, 545, 731, 1096, 1827, ...)."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource of this region."
  type        = map(string)
  default     = {}
}

variable "jwt_secret" {
  description = "HS256 key the gateways verify client JWTs with (FERRY_JWT_SECRET). Generated once by the root module and shared by every region, because latency routing can send a client to any region."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.jwt_secret) >= 32
    error_message = "jwt_secret must be at least 32 characters."
  }
}
