variable "project_name" {
  description = "Name prefix of every resource (each region appends its region name), e.g. `ferry`."
  type        = string
  default     = "ferry"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.project_name))
    error_message = "project_name must be 2-21 characters of lower-case letters, digits and '-', starting with a letter."
  }
}

variable "regions" {
  description = <<-EOT
    The regions ferry runs in, keyed by AWS region name, with each region's settings. Only regions that have an
    aliased provider and a module block in main.tf can be listed (today eu-west-1 and us-east-1; see README for
    adding one); leaving a supported region out removes it. Optional attributes default to the module's
    defaults.
  EOT
  type = map(object({
    kustomize_overlay                 = string
    vpc_cidr                          = string
    availability_zones                = optional(list(string))
    gateway_tls_certificate_arn       = optional(string)
    kubernetes_version                = optional(string, "1.31")
    node_instance_types               = optional(list(string), ["m6i.large"])
    node_min_size                     = optional(number, 3)
    node_desired_size                 = optional(number, 3)
    node_max_size                     = optional(number, 9)
    redis_node_type                   = optional(string, "cache.r7g.large")
    redis_num_cache_clusters          = optional(number, 3)
    redis_cluster_mode                = optional(bool, false)
    redis_num_node_groups             = optional(number, 3)
    redis_replicas_per_node_group     = optional(number, 1)
    postgres_instance_class           = optional(string, "db.r6g.large")
    postgres_allocated_storage_gb     = optional(number, 100)
    postgres_max_allocated_storage_gb = optional(number, 500)
    postgres_backup_retention_days    = optional(number, 14)
  }))

  default = {
    "eu-west-1" = {
      kustomize_overlay = "eu-west"
      vpc_cidr          = "10.10.0.0/16"
    }
    "us-east-1" = {
      kustomize_overlay = "us-east"
      vpc_cidr          = "10.20.0.0/16"
    }
  }

  validation {
    condition     = length(var.regions) > 0 && alltrue([for r in keys(var.regions) : contains(["eu-west-1", "us-east-1"], r)])
    error_message = "regions must name at least one region, and only regions wired in main.tf: eu-west-1, us-east-1."
  }

  validation {
    condition     = alltrue([for r in values(var.regions) : can(regex("^[a-z0-9][a-z0-9-]*$", r.kustomize_overlay))])
    error_message = "each region's kustomize_overlay must be a directory name under k8s/overlays/ (lower-case letters, digits, '-')."
  }

  validation {
    condition     = length(distinct([for r in values(var.regions) : r.vpc_cidr])) == length(var.regions)
    error_message = "each region needs its own vpc_cidr (distinct ranges keep the VPCs peerable)."
  }

  validation {
    condition     = alltrue([for r in values(var.regions) : r.node_min_size >= 1 && r.node_min_size <= r.node_desired_size && r.node_desired_size <= r.node_max_size && r.node_max_size <= 100])
    error_message = "each region needs 1 <= node_min_size <= node_desired_size <= node_max_size <= 100."
  }

  validation {
    condition     = alltrue([for r in values(var.regions) : r.redis_num_cache_clusters >= 2 && r.redis_num_cache_clusters <= 6])
    error_message = "each region's redis_num_cache_clusters must be from 2 to 6 (a primary and at least one replica for failover)."
  }

  validation {
    condition     = alltrue([for r in values(var.regions) : r.postgres_allocated_storage_gb >= 20 && r.postgres_allocated_storage_gb <= r.postgres_max_allocated_storage_gb])
    error_message = "each region needs 20 <= postgres_allocated_storage_gb <= postgres_max_allocated_storage_gb."
  }
}

variable "cluster_public_access_cidrs" {
  description = "CIDRs allowed to reach the EKS API servers' public endpoints (the deployers' and CI's egress addresses). Never 0.0.0.0/0."
  type        = list(string)

  validation {
    condition     = length(var.cluster_public_access_cidrs) > 0 && alltrue([for c in var.cluster_public_access_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "cluster_public_access_cidrs must be a non-empty list of valid CIDRs, none of them 0.0.0.0/0."
  }
}

variable "cluster_admin_role_arns" {
  description = "IAM role ARNs given cluster-admin on every region's EKS cluster (the identity running Terraform gets it anyway)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.cluster_admin_role_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$", a))])
    error_message = "cluster_admin_role_arns must be IAM role ARNs."
  }
}

variable "dns_zone_name" {
  description = "DNS zone the latency-routed gateway record lives in, e.g. `example.com`. A public Route 53 zone of this name is created unless dns_zone_id is set."
  type        = string

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.dns_zone_name))
    error_message = "dns_zone_name must be a lower-case DNS name without a trailing dot, e.g. example.com."
  }
}

variable "dns_zone_id" {
  description = "ID of an existing Route 53 hosted zone for dns_zone_name; null creates a new public zone (whose name servers are an output, to delegate to)."
  type        = string
  default     = null

  validation {
    condition     = var.dns_zone_id == null || can(regex("^Z[A-Z0-9]{1,32}$", var.dns_zone_id))
    error_message = "dns_zone_id must be a Route 53 hosted zone ID such as Z0123456789ABCDEFGHIJ, or null."
  }
}

variable "dns_record_name" {
  description = "Label of the latency-routed gateway record inside dns_zone_name (e.g. `api` gives api.example.com). Not the zone apex: the records are CNAMEs to the load balancers."
  type        = string
  default     = "api"

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.dns_record_name))
    error_message = "dns_record_name must be a single DNS label (lower-case letters, digits, '-')."
  }
}

variable "dns_ttl" {
  description = "TTL in seconds of the latency-routed records; short, so clients move off a region soon after its health check fails."
  type        = number
  default     = 60

  validation {
    condition     = var.dns_ttl >= 5 && var.dns_ttl <= 300
    error_message = "dns_ttl must be from 5 to 300 seconds."
  }
}

variable "health_check_failure_threshold" {
  description = "Consecutive failed /readyz checks (10 s apart) before Route 53 takes a region out of the answers."
  type        = number
  default     = 3

  validation {
    condition     = var.health_check_failure_threshold >= 1 && var.health_check_failure_threshold <= 10
    error_message = "health_check_failure_threshold must be from 1 to 10."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource (on top of the providers' default tags)."
  type        = map(string)
  default     = {}
}
