# RDS PostgreSQL 15: multi-AZ, encrypted with the region's KMS key, deletion protection, automated backups,
# TLS required, IAM authentication available, Performance Insights and enhanced monitoring. The master password
# is generated in secrets.tf and kept in Secrets Manager (see README for why not manage_master_user_password).

resource "aws_security_group" "postgres" {
  name_prefix = "${local.prefix}-postgres-"
  description = "ferry PostgreSQL: port 5432 from the EKS nodes only"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.prefix}-postgres" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "postgres_from_nodes" {
  security_group_id            = aws_security_group.postgres.id
  description                  = "PostgreSQL (TLS) from the EKS cluster's nodes"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = local.node_security_group_id
  tags                         = local.tags
}

resource "aws_db_subnet_group" "this" {
  name_prefix = "${local.prefix}-postgres-"
  description = "ferry ${var.region}: private subnets for PostgreSQL"
  subnet_ids  = aws_subnet.private[*].id
  tags        = local.tags
}

resource "aws_db_parameter_group" "this" {
  name_prefix = "${local.prefix}-postgres15-"
  family      = "postgres15"
  description = "ferry ${var.region}: PostgreSQL 15 settings"

  # Clients must use TLS (database-url says sslmode=require).
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  # Query logging: DDL statements and every statement slower than a second.
  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }

  parameter {
    name  = "log_connections"
    value = "1"
  }

  parameter {
    name  = "log_disconnections"
    value = "1"
  }

  tags = local.tags

  lifecycle {
    create_before_destroy = true
  }
}

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name_prefix        = "${var.name}-rds-monitoring-"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "this" {
  identifier     = "${local.prefix}-postgres"
  engine         = "postgres"
  engine_version = var.postgres_engine_version
  instance_class = var.postgres_instance_class

  db_name  = var.postgres_database_name
  username = var.postgres_username
  password = random_password.postgres.result
  port     = 5432

  allocated_storage     = var.postgres_allocated_storage_gb
  max_allocated_storage = var.postgres_max_allocated_storage_gb
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.this.arn

  multi_az               = true
  db_subnet_group_name   = aws_db_subnet_group.this.name
  vpc_security_group_ids = [aws_security_group.postgres.id]
  publicly_accessible    = false
  parameter_group_name   = aws_db_parameter_group.this.name
  ca_cert_identifier     = "rds-ca-rsa2048-g1"

  iam_database_authentication_enabled = true

  backup_retention_period   = var.postgres_backup_retention_days
  backup_window             = "02:00-03:00"
  maintenance_window        = "sun:04:00-sun:05:00"
  copy_tags_to_snapshot     = true
  deletion_protection       = true
  skip_final_snapshot       = false
  final_snapshot_identifier = "${local.prefix}-postgres-final"

  auto_minor_version_upgrade  = true
  allow_major_version_upgrade = false
  apply_immediately           = false

  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.this.arn
  performance_insights_retention_period = 7
  monitoring_interval                   = 30
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn

  tags = local.tags

  lifecycle {
    precondition {
      condition     = var.postgres_max_allocated_storage_gb >= var.postgres_allocated_storage_gb
      error_message = "postgres_max_allocated_storage_gb must be at least postgres_allocated_storage_gb."
    }
  }

  depends_on = [aws_iam_role_policy_attachment.rds_monitoring]
}
