output "gateway_url" {
  description = "The global, latency-routed gateway URL clients use (https only when every region has a TLS certificate)."
  value       = "${alltrue([for r in values(var.regions) : r.gateway_tls_certificate_arn != null]) ? "https" : "http"}://${local.record_fqdn}"
}

output "gateway_hostnames" {
  description = "Per region, the hostname of the load balancer in front of that region's gateways."
  value       = local.gateway_hostnames
}

output "cluster_names" {
  description = "Per region, the name of the EKS cluster (for `aws eks update-kubeconfig --region <region> --name <name>`)."
  value       = { for region, m in local.regional : region => m.cluster_name }
}

output "cluster_endpoints" {
  description = "Per region, the EKS API server endpoint."
  value       = { for region, m in local.regional : region => m.cluster_endpoint }
}

output "redis_endpoints" {
  description = "Per region, the primary endpoint of the Redis replication group (TLS; the AUTH token is in Secrets Manager)."
  value       = { for region, m in local.regional : region => m.redis_primary_endpoint }
}

output "postgres_endpoints" {
  description = "Per region, host:port of the PostgreSQL instance (TLS; the credentials are in Secrets Manager)."
  value       = { for region, m in local.regional : region => m.postgres_endpoint }
}

output "secret_arns" {
  description = "Per region, the ARNs (not the values) of the Secrets Manager secrets ferry-secrets is built from."
  value       = { for region, m in local.regional : region => m.secret_arns }
}

output "dns_zone_id" {
  description = "ID of the Route 53 zone holding the gateway records."
  value       = local.zone_id
}

output "dns_name_servers" {
  description = "Name servers of the zone created here, to delegate dns_zone_name to (empty when dns_zone_id was given)."
  value       = try(aws_route53_zone.this[0].name_servers, [])
}

output "health_check_ids" {
  description = "Per region, the ID of the Route 53 health check on the gateway's /readyz."
  value       = { for region, hc in aws_route53_health_check.gateway : region => hc.id }
}
