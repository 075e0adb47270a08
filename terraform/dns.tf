# Global latency-based DNS: one record name (e.g. api.example.com) with one latency-routed CNAME per region,
# each pointing at that region's public gateway load balancer (HTTPS on 443 where the region has a TLS
# certificate, else HTTP on 80) and guarded by a Route 53 health check on the gateway's
# /readyz. Route 53 answers with the healthy region of lowest latency to the resolver; a region whose /readyz
# fails (503 while draining, or no answer) is left out until it passes again.

resource "aws_route53_zone" "this" {
  #checkov:skip=CKV2_AWS_38:DNSSEC signing needs a DS record at the parent zone, which is set out of band by whoever owns the domain; enable it there with an aws_route53_key_signing_key when the registrar supports it.
  #checkov:skip=CKV2_AWS_39:Query logs for the one record served here add nothing the load balancer logs and health checks do not show; zone query logging needs a us-east-1 log group with a resource policy, to add when someone needs it.
  count = var.dns_zone_id == null ? 1 : 0

  name          = var.dns_zone_name
  comment       = "ferry: latency-routed gateway records"
  force_destroy = false
}

locals {
  zone_id     = var.dns_zone_id != null ? var.dns_zone_id : aws_route53_zone.this[0].zone_id
  record_fqdn = "${var.dns_record_name}.${var.dns_zone_name}"

  gateway_hostnames = { for region, m in local.regional : region => m.gateway_hostname }
  gateway_protocols = { for region, m in local.regional : region => m.gateway_protocol }
  gateway_ports     = { for region, m in local.regional : region => m.gateway_port }
}

resource "aws_route53_health_check" "gateway" {
  for_each = var.regions

  fqdn              = local.gateway_hostnames[each.key]
  type              = local.gateway_protocols[each.key]
  port              = local.gateway_ports[each.key]
  resource_path     = "/readyz"
  request_interval  = 10
  failure_threshold = var.health_check_failure_threshold
  measure_latency   = true
  enable_sni        = local.gateway_protocols[each.key] == "HTTPS" ? true : null

  tags = merge(local.default_tags, {
    Name           = "${var.project_name}-gateway-${each.key}"
    "ferry/region" = each.key
  })

  lifecycle {
    precondition {
      condition     = local.gateway_hostnames[each.key] != ""
      error_message = "The gateway Service of ${each.key} has no load balancer hostname yet; wait for the load balancer and apply again."
    }
  }
}

resource "aws_route53_record" "gateway" {
  for_each = var.regions

  zone_id         = local.zone_id
  name            = local.record_fqdn
  type            = "CNAME"
  ttl             = var.dns_ttl
  records         = [local.gateway_hostnames[each.key]]
  set_identifier  = each.key
  health_check_id = aws_route53_health_check.gateway[each.key].id

  latency_routing_policy {
    region = each.key
  }
}
