# ElastiCache for Redis: one replication group, a primary and replicas spread over the zones with automatic
# failover, TLS in transit, encryption at rest with the region's KMS key, and an AUTH token generated in
# secrets.tf. Cluster mode is off by default (one shard, `--redis`); with `redis_cluster_mode` the group is a
# Redis Cluster of `redis_num_node_groups` shards, which ferry spreads its queues over in virtual shards
# (`--redis-cluster`, docs/sharding.md).

resource "aws_security_group" "redis" {
  name_prefix = "${local.prefix}-redis-"
  description = "ferry Redis: port 6379 from the EKS nodes only"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.prefix}-redis" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_nodes" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis (TLS) from the EKS cluster's nodes"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = local.node_security_group_id
  tags                         = local.tags
}

resource "aws_elasticache_subnet_group" "this" {
  name        = "${local.prefix}-redis"
  description = "ferry ${var.region}: private subnets for Redis"
  subnet_ids  = aws_subnet.private[*].id
  tags        = local.tags
}

resource "aws_elasticache_parameter_group" "this" {
  # A group's cluster-enabled setting cannot change: cluster mode gets a group of its own.
  name        = var.redis_cluster_mode ? "${local.prefix}-redis7-cluster" : "${local.prefix}-redis7"
  family      = "redis7"
  description = "ferry ${var.region}: Redis 7 settings"

  # Persistence, chosen on purpose (docs/architecture.md, "Redis persistence"): ElastiCache for Redis 7 has no
  # AOF; durability is the Multi-AZ replicas below. Replication is asynchronous, so a failover can lose the
  # primary's last writes (typically well under a second). ferry accepts that: the workers' reconciler puts
  # back, from PostgreSQL, every job the recorder had copied and the new primary does not know
  # (--reconcile-grace-ms, --reconcile-interval-ms). For no loss at all, MemoryDB (a multi-AZ transaction log)
  # is the managed option.

  # Queues and the event log must never be evicted.
  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }

  dynamic "parameter" {
    for_each = var.redis_cluster_mode ? ["yes"] : []
    content {
      name  = "cluster-enabled"
      value = parameter.value
    }
  }

  lifecycle {
    create_before_destroy = true
  }

  tags = local.tags
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id = "${local.prefix}-redis"
  description          = "ferry ${var.region}: job queue and pub/sub"
  engine               = "redis"
  engine_version       = var.redis_engine_version
  node_type            = var.redis_node_type
  port                 = 6379
  parameter_group_name = aws_elasticache_parameter_group.this.name
  subnet_group_name    = aws_elasticache_subnet_group.this.name
  security_group_ids   = [aws_security_group.redis.id]

  # Cluster mode disabled: one shard, a primary and replicas. Enabled: node groups of a primary and replicas.
  num_cache_clusters          = var.redis_cluster_mode ? null : var.redis_num_cache_clusters
  preferred_cache_cluster_azs = var.redis_cluster_mode ? null : [for i in range(var.redis_num_cache_clusters) : local.azs[i % length(local.azs)]]
  num_node_groups             = var.redis_cluster_mode ? var.redis_num_node_groups : null
  replicas_per_node_group     = var.redis_cluster_mode ? var.redis_replicas_per_node_group : null
  automatic_failover_enabled  = true
  multi_az_enabled            = true

  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.this.arn
  transit_encryption_enabled = true
  auth_token                 = random_password.redis_auth.result
  auth_token_update_strategy = "ROTATE"

  snapshot_retention_limit   = var.redis_snapshot_retention_days
  snapshot_window            = "03:00-04:00"
  maintenance_window         = "sun:05:00-sun:06:00"
  auto_minor_version_upgrade = true
  apply_immediately          = false

  tags = local.tags
}
