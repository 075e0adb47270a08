# Generated secrets. Every value is made by `random_password` (never a literal; the JWT key is generated once by
# the root module and passed in, because latency routing may send a client to any region and every region must
# accept its token), kept in AWS Secrets Manager
# (encrypted with the region's KMS key) as the source of truth for operators, and copied into the Kubernetes
# secret `ferry-secrets` (workloads.tf). None of them is an unmarked output. They are in the Terraform state,
# as every value Terraform sets is: the state backend must be encrypted and access-controlled (see README).

resource "random_password" "redis_auth" {
  # ElastiCache AUTH tokens: 16-128 printable characters without '@', '"' or '/'; alphanumerics only also keep
  # the token URL-safe inside redis-urls.
  length  = 64
  special = false
}

resource "random_password" "postgres" {
  # Alphanumerics only: the password goes into database-url unescaped.
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret" "redis_auth" {
  #checkov:skip=CKV2_AWS_57:Terraform generates the token and copies it into ferry-secrets; a Secrets Manager rotation Lambda would change it behind the pods' back. Rotate by replacing random_password.redis_auth (see README).
  name_prefix             = "${local.prefix}/redis-auth-token-"
  description             = "ferry ${var.region}: ElastiCache Redis AUTH token"
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id     = aws_secretsmanager_secret.redis_auth.id
  secret_string = random_password.redis_auth.result
}

resource "aws_secretsmanager_secret" "postgres" {
  #checkov:skip=CKV2_AWS_57:Terraform generates the password and copies it into database-url; rotation outside Terraform would break the workloads until the next apply. Rotate by replacing random_password.postgres (see README).
  name_prefix             = "${local.prefix}/postgres-"
  description             = "ferry ${var.region}: RDS PostgreSQL master credentials"
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "postgres" {
  secret_id = aws_secretsmanager_secret.postgres.id
  secret_string = jsonencode({
    engine   = "postgres"
    username = var.postgres_username
    password = random_password.postgres.result
    host     = aws_db_instance.this.address
    port     = aws_db_instance.this.port
    dbname   = var.postgres_database_name
  })
}

resource "aws_secretsmanager_secret" "jwt" {
  #checkov:skip=CKV2_AWS_57:The JWT key is shared with the token issuer; rotating it is a coordinated change (see README), not a Lambda's job.
  name_prefix             = "${local.prefix}/jwt-secret-"
  description             = "ferry ${var.region}: HS256 key the gateways verify client JWTs with"
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "jwt" {
  secret_id     = aws_secretsmanager_secret.jwt.id
  secret_string = var.jwt_secret
}
