# One cluster node per entry of var.nodes: a fixed-IP network interface, an EBS volume, a launch
# template whose user data runs cps-attach, and a one-instance Auto Scaling group in the node's
# subnet with a launching lifecycle hook. cps-attach (at boot) attaches the node's volume and
# interface, writes its files, runs its hooks and completes the hook; cps-roll (here, on
# template changes) replaces outdated nodes one at a time.

data "aws_region" "current" {}

data "aws_subnet" "node" {
  for_each = local.nodes
  id       = each.value.node_subnet_id
}

locals {
  nodes = { for n in var.nodes : n.node_id => n }
  files = { for f in var.node_files : f.node_id => f.node_files_toupload }
  # What the node files read at boot: the nodes' role may read these and nothing else.
  secrets = distinct(flatten([for f in var.node_files : [for u in f.node_files_toupload : u.content_from if u.content_from != null]]))
  hook    = "${var.app_name}-launch"

  cluster_tags = merge(var.tags, { "cps:cluster" = var.app_name })
  node_tags = {
    for id, n in local.nodes : id => merge(local.cluster_tags, {
      "cps:node-id" = id
      Name          = "${var.app_name}-${id}"
    })
  }
}

module "node_config" {
  source   = "./modules/node-config"
  for_each = local.nodes

  cluster_name            = var.app_name
  node_id                 = each.key
  lifecycle_hook_name     = local.hook
  data_volume             = var.data_volume
  encrypted               = var.encrypted
  kms_key_id              = var.kms_key_id
  files                   = lookup(local.files, each.key, [])
  node_config_script      = var.node_config_script
  configure_command       = var.configure_command
  health_command          = var.health_command
  command_timeout_seconds = var.command_timeout_seconds
}

resource "aws_network_interface" "node" {
  for_each        = local.nodes
  subnet_id       = each.value.node_subnet_id
  private_ips     = [each.value.node_ip]
  security_groups = var.security_groups
  description     = "Fixed IP of ${var.app_name} node ${each.key}"
  tags            = local.node_tags[each.key]
}

resource "aws_ebs_volume" "node" {
  for_each          = local.nodes
  availability_zone = data.aws_subnet.node[each.key].availability_zone
  size              = var.data_volume.size_in_gibs
  type              = var.data_volume.type
  iops              = var.data_volume.iops
  throughput        = var.data_volume.throughput_mib_per_sec
  encrypted         = var.encrypted
  kms_key_id        = var.kms_key_id
  tags              = merge(var.data_volume.tags, local.node_tags[each.key])

  lifecycle {
    # cps-attach keeps its format journal in this tag; it is not Terraform's to remove.
    ignore_changes = [tags["cps:filesystem"]]
  }
}

resource "aws_launch_template" "node" {
  for_each      = local.nodes
  name_prefix   = "${var.app_name}-${each.key}-"
  image_id      = coalesce(each.value.node_image, var.node_image)
  instance_type = var.instance_type
  key_name      = var.node_key_name
  user_data = base64encode(templatefile("${path.module}/templates/user_data.sh.tftpl", {
    config         = module.node_config[each.key].yaml
    cps_attach     = var.cps_attach_path
    source         = var.cps_attach_source
    region         = data.aws_region.current.name
    config_path    = "/etc/cps/attach.yml"
    node_id        = each.key
    cluster        = var.app_name
    lifecycle_hook = local.hook
  }))

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = var.http_put_response_hop_limit
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = var.root_volume.device_name
    ebs {
      volume_size           = var.root_volume.size_in_gibs
      volume_type           = var.root_volume.type
      encrypted             = var.encrypted
      kms_key_id            = var.kms_key_id
      delete_on_termination = true
    }
  }

  network_interfaces {
    device_index                = 0
    subnet_id                   = each.value.node_subnet_id
    security_groups             = var.security_groups
    associate_public_ip_address = false
    delete_on_termination       = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = local.node_tags[each.key]
  }

  tags = local.node_tags[each.key]

  lifecycle {
    precondition {
      condition     = var.node_config_script == null || (length(var.configure_command) == 0 && length(var.health_command) == 0)
      error_message = "Give either node_config_script or configure_command/health_command, not both."
    }
  }
}

resource "aws_autoscaling_group" "node" {
  for_each            = local.nodes
  name                = "${var.app_name}-${each.key}"
  min_size            = 1
  max_size            = 1
  desired_capacity    = 1
  vpc_zone_identifier = [each.value.node_subnet_id]
  health_check_type   = "EC2"
  # Nodes wait in Pending:Wait until healthy; the roll (not Terraform) waits for InService, so a
  # slow first boot never taints a group and gets it replaced outside the roll.
  wait_for_capacity_timeout = "0"

  launch_template {
    id      = aws_launch_template.node[each.key].id
    version = aws_launch_template.node[each.key].latest_version
  }

  initial_lifecycle_hook {
    name                 = local.hook
    lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
    heartbeat_timeout    = var.asg_lifecycle_hook_heartbeat_timeout
    default_result       = var.lifecycle_default_result
  }

  dynamic "tag" {
    for_each = local.node_tags[each.key]
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  # The volume and interface exist before the first instance boots and looks for them.
  depends_on = [aws_ebs_volume.node, aws_network_interface.node, aws_iam_role_policy.node]
}

# Replaces outdated nodes one at a time whenever a launch template gets a new version.
resource "terraform_data" "roll" {
  count            = var.roll_enabled ? 1 : 0
  triggers_replace = { for id, lt in aws_launch_template.node : id => lt.latest_version }

  provisioner "local-exec" {
    command = "${var.roll_command} run --cluster ${var.app_name} --timeout ${var.asg_inservice_timeout_in_mins}m"
    environment = {
      AWS_REGION = data.aws_region.current.name
    }
  }

  depends_on = [aws_autoscaling_group.node]
}
