output "cluster_name" {
  description = "Name of the region's EKS cluster."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "HTTPS endpoint of the EKS API server (used to configure the kubernetes and kustomization providers)."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 PEM of the EKS cluster's certificate authority (public)."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "gateway_hostname" {
  description = "Hostname of the load balancer in front of the region's gateways (empty until the Service has one); the target of the latency-routed DNS record."
  value       = local.gateway_hostname
}

output "gateway_protocol" {
  description = "Protocol of the gateways' public load balancer: HTTPS with gateway_tls_certificate_arn, else HTTP."
  value       = local.gateway_protocol
}

output "gateway_port" {
  description = "Port of the gateways' public load balancer: 443 with TLS, else 80."
  value       = local.gateway_port
}

output "vpc_id" {
  description = "ID of the region's VPC."
  value       = aws_vpc.this.id
}

output "private_subnet_ids" {
  description = "IDs of the private subnets (nodes, Redis, PostgreSQL)."
  value       = aws_subnet.private[*].id
}

output "public_subnet_ids" {
  description = "IDs of the public subnets (NAT gateways, internet-facing load balancers)."
  value       = aws_subnet.public[*].id
}

output "redis_primary_endpoint" {
  description = "Primary endpoint address of the Redis replication group (TLS, port 6379; the AUTH token is in Secrets Manager)."
  value       = aws_elasticache_replication_group.this.primary_endpoint_address
}

output "redis_reader_endpoint" {
  description = "Reader endpoint address of the Redis replication group."
  value       = aws_elasticache_replication_group.this.reader_endpoint_address
}

output "postgres_endpoint" {
  description = "host:port of the PostgreSQL instance (TLS required; the credentials are in Secrets Manager)."
  value       = aws_db_instance.this.endpoint
}

output "secret_arns" {
  description = "ARNs of the Secrets Manager secrets holding the Redis AUTH token, the PostgreSQL credentials and the JWT key (the ARNs, not the values)."
  value = {
    redis_auth_token = aws_secretsmanager_secret.redis_auth.arn
    postgres         = aws_secretsmanager_secret.postgres.arn
    jwt_secret       = aws_secretsmanager_secret.jwt.arn
  }
}

output "kms_key_arn" {
  description = "ARN of the region's customer-managed KMS key."
  value       = aws_kms_key.this.arn
}

output "kubernetes_namespace" {
  description = "Namespace the ferry workloads run in."
  value       = kubernetes_namespace.ferry.metadata[0].name
}

output "database_url" {
  description = "PostgreSQL URL of the region, password included (the value of ferry-secrets' database-url)."
  value       = local.database_url
  sensitive   = true
}

output "redis_urls" {
  description = "Comma-separated Redis URLs of the region, AUTH token included (the value of ferry-secrets' redis-urls)."
  value       = local.redis_urls
  sensitive   = true
}
