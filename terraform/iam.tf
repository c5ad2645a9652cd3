# The nodes' role: exactly the actions cps-attach needs (README, IAM), scoped to this cluster's
# tag wherever AWS supports a condition, plus SSM Session Manager access.

locals {
  cluster_condition = { "aws:ResourceTag/cps:cluster" = var.app_name }

  node_statements = concat(
    [
      {
        Sid      = "Describe"
        Effect   = "Allow"
        Action   = ["ec2:DescribeVolumes", "ec2:DescribeInstances", "ec2:DescribeTags", "ec2:DescribeNetworkInterfaces"]
        Resource = "*"
      },
      {
        Sid       = "CreateClusterVolume"
        Effect    = "Allow"
        Action    = ["ec2:CreateVolume"]
        Resource  = "arn:aws:ec2:*:*:volume/*"
        Condition = { StringEquals = { "aws:RequestTag/cps:cluster" = var.app_name } }
      },
      {
        Sid       = "TagOnCreate"
        Effect    = "Allow"
        Action    = ["ec2:CreateTags"]
        Resource  = "arn:aws:ec2:*:*:volume/*"
        Condition = { StringEquals = { "ec2:CreateAction" = "CreateVolume" } }
      },
      {
        Sid    = "AttachClusterVolumesAndInterfaces"
        Effect = "Allow"
        Action = ["ec2:AttachVolume", "ec2:AttachNetworkInterface"]
        Resource = [
          "arn:aws:ec2:*:*:volume/*",
          "arn:aws:ec2:*:*:network-interface/*",
          "arn:aws:ec2:*:*:instance/*",
        ]
        Condition = { StringEquals = local.cluster_condition }
      },
      {
        Sid      = "FindGroupAndHook"
        Effect   = "Allow"
        Action   = ["autoscaling:DescribeAutoScalingInstances", "autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeLifecycleHooks"]
        Resource = "*"
      },
      {
        Sid       = "CompleteOwnLaunch"
        Effect    = "Allow"
        Action    = ["autoscaling:RecordLifecycleActionHeartbeat", "autoscaling:CompleteLifecycleAction"]
        Resource  = "*"
        Condition = { StringEquals = { "autoscaling:ResourceTag/cps:cluster" = var.app_name } }
      },
    ],
    var.kms_key_id == null ? [] : [{
      Sid      = "UseVolumeKey"
      Effect   = "Allow"
      Action   = ["kms:CreateGrant", "kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt"]
      Resource = var.kms_key_id
    }],
  )
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
  policy = jsonencode({ Version = "2012-10-17", Statement = local.node_statements })
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
