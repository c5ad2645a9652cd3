# The nodes' role: the policy of modules/node-policy plus SSM Session Manager access.

module "node_policy" {
  source              = "./modules/node-policy"
  app_name            = var.app_name
  kms_key_id          = var.kms_key_id
  secrets             = local.secrets
  secrets_kms_key_arn = var.node_secrets_kms_key_arn
  relocation          = var.relocation != "never"
  lock_table_arn      = one(aws_dynamodb_table.relocation_lock[*].arn)
  delete_source       = var.relocation_delete_source
}

resource "aws_iam_role" "node" {
  name_prefix = "${var.app_name}-node-"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Action    = "sts:AssumeRole"
      Principal = { Service = "ec2.amazonaws.com" }
    }]
  })
  tags = local.cluster_tags
}

resource "aws_iam_role_policy" "node" {
  name   = "cps-attach"
  role   = aws_iam_role.node.id
  policy = module.node_policy.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.node.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "node" {
  name_prefix = "${var.app_name}-node-"
  role        = aws_iam_role.node.name
  tags        = local.cluster_tags
}
